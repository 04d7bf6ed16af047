"""What only the tests, the demo and the benchmark use (offline tokenizer folders...), kept apart
from the converter's own modules so that the shipped path is easy to see."""
