import os
import sys

# Make the shared helpers importable as `testing` whatever the rootdir / import mode.
sys.path.insert(0, os.path.dirname(__file__))
