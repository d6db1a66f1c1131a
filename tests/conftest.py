import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (naive.py, models.py) by name
