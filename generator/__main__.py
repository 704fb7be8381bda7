from generator.run import main

raise SystemExit(main())
