"""scikit-learn's 8x8 digits with a small MLP: the embedded default (`optlab train` with no config).

The config lives in the package (``optlab.config.default_config``) so that the
installed command has it; this file is the same config, for editing.
"""

from optlab.config import default_config


def get_config():
    return default_config()
