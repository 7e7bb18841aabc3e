"""A check script for `tests/cli/test_cli_messages.py`: counts its runs in $XENTJAX_COUNT_FILE."""

import json
import os
import time

with open(os.environ["XENTJAX_COUNT_FILE"], "a") as f:
  f.write("ran\n")
time.sleep(0.5)  # long enough for a second caller to arrive while this one runs
print("RESULTS=" + json.dumps({"counted": "ok"}))
