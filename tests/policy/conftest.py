import pathlib
import sys

# The pack's modules import each other as top-level modules (the Pulumi CLI runs policy/__main__.py as a script).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "policy"))
