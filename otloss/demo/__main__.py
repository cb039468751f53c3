from otloss.demo.cli import main

raise SystemExit(main())
