"""Models: the conventions every teacher/student follows, spec loading, the reference zoo."""
