"""``python -m transports.broker unix:///abs/dir/broker.sock [--max-... N]``."""
import sys

from .launcher import _cli

sys.exit(_cli())
