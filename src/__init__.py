# Every entry point imports src: the project root ($HIAR_ROOT), the run-id resolver, the config resolvers (global
# batch split, frozen-model dtype) and the typed config schemas (Hydra's ConfigStore) exist before any config composed
# by a `src` entry point or test is resolved.
from hydra.core.config_store import ConfigStore

from src.artifacts import setup_root
from src.distributed.config import register_resolvers
from src.distributed.parallelize import ParallelizeConfig
from src.sampling.orders import SamplerConfig

setup_root()
register_resolvers()
# conf/sampler/*.yaml extend the dataclass: its defaults and types are the only ones (an override of the wrong type
# fails at composition, naming the key)
ConfigStore.instance().store(group="sampler", name="schema", node=SamplerConfig)
ConfigStore.instance().store(group="parallelize", name="schema", node=ParallelizeConfig)
