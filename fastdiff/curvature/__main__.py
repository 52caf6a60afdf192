"""``python -m fastdiff.curvature``: the command lives above the estimator, in curvature_cli."""

from fastdiff.curvature_cli import main

raise SystemExit(main())
