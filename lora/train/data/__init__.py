"""The data side of training: the data set and its split, aspect buckets, the seeded batch
order, the run's plan (steps, epochs) and the latent / text-embedding cache."""
