import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while still importing: nothing was written yet
    sys.stderr.write("sepify: interrupted\n")
    sys.exit(130)

main()
