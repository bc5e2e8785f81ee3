"""``python -m hf_cft.accelerate_configs [NAME]``: the path of a shipped accelerate config, or the list of them."""

import sys

from hf_cft.accelerate_configs import config_path, listing
from hf_cft.errors import OptionError


def main(argv: list[str]) -> int:
    if not argv:
        print(listing())
        return 0
    try:
        print(config_path(argv[0]))
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
