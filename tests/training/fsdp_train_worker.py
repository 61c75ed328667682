"""Run under torchrun by test_fsdp_train.py: several `lorakit.train(..., fsdp=True)` jobs in one
process group (one launch instead of one per job), each a JSON object of train() keywords."""
import json
import sys

import lorakit as lk
from lorakit.training import distributed

if __name__ == "__main__":
    for job in json.loads(open(sys.argv[1]).read()):
        lk.train(**job, fsdp=True, progress=False)
    distributed.finish()
