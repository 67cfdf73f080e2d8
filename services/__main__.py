from alignedserve.cli import main

raise SystemExit(main())
