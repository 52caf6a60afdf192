from fastdiff.report.render import main

raise SystemExit(main())
