"""What a forward pass computes for training and evaluation alike: the losses (summed over supervised tokens,
chunked cross-entropy), and attention that keeps packed examples apart. Below training and evaluation, so that
neither imports the other for it."""
