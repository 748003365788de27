"""Training the EAGLE-3 style draft head: data, cached target features, vocabulary, trainer."""
