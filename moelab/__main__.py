import sys

try:
    from moelab.cli import main
except KeyboardInterrupt:            # a Ctrl-C while the package is still importing
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
