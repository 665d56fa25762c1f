"""Layer 2: records -> validated examples -> token ids -> tokenised cache -> packed micro-batches."""
