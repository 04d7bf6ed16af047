"""What only tests, benchmarks and the demo use: small models and offline tokenizers made
locally. Nothing in the converter's path imports this package."""
