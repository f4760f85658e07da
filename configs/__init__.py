"""ml_collections configs for train.py: common.py holds every field, one short file per recipe."""
