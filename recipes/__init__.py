"""kdpipe's recipes: the demos (spoken digits, image digits, pitch), their corpora and reports.

They use kdpipe as any user would, through its jobs and library; nothing in ``pipeline/``
imports them. Their extra dependencies (matplotlib, espeakng-loader, scikit-learn) are the
``demo`` extra: ``pip install -e '.[demo]'`` (``make setup`` installs it).
"""
