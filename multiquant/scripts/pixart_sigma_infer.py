"""`qua2sedimo infer --model pixart_sigma` as a script (all flags of the command work; --help lists them)."""
from multiquant.scripts import run

if __name__ == "__main__":
    run("infer", "pixart_sigma")
