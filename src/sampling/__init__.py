from src.sampling.noise import NoiseBank as NoiseBank
from src.sampling.orders import SamplerConfig as SamplerConfig
from src.sampling.orders import denoise_cell as denoise_cell
from src.sampling.orders import sample as sample
from src.sampling.primitive import denoise_chunk as denoise_chunk
from src.sampling.primitive import write_context as write_context
from src.sampling.streaming import stream as stream
