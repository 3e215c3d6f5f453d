from ditpipe.cli import main

raise SystemExit(main())
