"""Data: the dataset layout, the digital phantom cohort, and 2.5D window datasets."""

from mmdm.data.layout import (  # noqa: F401
    DatasetError,
    Layout,
    image_path,
    make_splits,
)
