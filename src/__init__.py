# Config resolvers (global batch split, frozen-model dtype) must exist before any config composed by a `src` entry
# point or test is resolved.
from src.distributed.config import register_resolvers

register_resolvers()
