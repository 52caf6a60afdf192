"""python -m fastdiff.eval RUN_DIR [--step N] [--nfe 50] [--samples 10000] [--sampler ddpm]"""

from fastdiff.fid import main

if __name__ == "__main__":
    raise SystemExit(main())
