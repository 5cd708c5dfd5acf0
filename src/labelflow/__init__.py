"""labelflow: transfer-learning image classification, embedding index and autolabelling.

The science of the Snakemake workflow lives here; rules and scripts only wire it.
"""

import os

# albumentations asks PyPI for a newer version at import time; there is no network on
# the machines this runs on, so the check would only add a timeout.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
