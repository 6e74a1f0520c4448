import argparse
import sys

from ..commands import bench

p = argparse.ArgumentParser(prog="python -m attnzoo.bench", description=bench.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
bench.add_arguments(p)
sys.exit(bench.run(p.parse_args()))
