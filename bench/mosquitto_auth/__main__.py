import sys

from bench.mosquitto_auth import main

sys.exit(main(sys.argv[1:]))
