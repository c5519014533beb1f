"""Names the app's tests share: the library of random experts the fixtures install."""

RANDOM_BASE_MODEL = "quiver-test/tiny-llama"
RANDOM_LIBRARY = "quiver-test/random-experts"
RANDOM_EXPERTS = ("amber", "birch", "cobalt", "dune")
