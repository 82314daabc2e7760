"""Several people's regions and the mask file format: see :mod:`spatialid.injection.people`.

Kept as an import path for the front-ends; the code lives with the injection layer, which reads
it for every identity call.
"""

from spatialid.injection.people import (  # noqa: F401
    MASK_FILE_FORMAT,
    MaskFileError,
    RegionError,
    check_people_count,
    describe_region,
    load_mask_file,
    mask_replay_table,
    masks_tensor,
    parse_box,
    region_list,
    regions_tensor,
    save_mask_file,
    split_person,
)

__all__ = [
    "MASK_FILE_FORMAT",
    "MaskFileError",
    "RegionError",
    "check_people_count",
    "describe_region",
    "load_mask_file",
    "mask_replay_table",
    "masks_tensor",
    "parse_box",
    "region_list",
    "regions_tensor",
    "save_mask_file",
    "split_person",
]
