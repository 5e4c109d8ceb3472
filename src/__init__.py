# Every entry point imports src: the project root ($HIAR_ROOT), the run-id resolver and the config resolvers (global
# batch split, frozen-model dtype) exist before any config composed by a `src` entry point or test is resolved.
from src.artifacts import setup_root
from src.distributed.config import register_resolvers

setup_root()
register_resolvers()
