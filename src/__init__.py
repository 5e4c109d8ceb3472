# Every entry point imports src: the project root ($HIAR_ROOT) and the run-id resolver exist before Hydra composes.
from src.artifacts import setup_root

setup_root()
