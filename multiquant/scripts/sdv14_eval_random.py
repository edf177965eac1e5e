"""`qua2sedimo eval-random --model sdv14` as a script (all flags of the command work; --help lists them)."""
from multiquant.scripts import run

if __name__ == "__main__":
    run("eval_random", "sdv14")
