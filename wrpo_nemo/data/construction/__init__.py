"""Building WRPO data as the paper does: ``generate`` responses, ``score`` them with a reward model,
``select`` y_ws / y_wt / y_l. Each step reads and writes JSONL and resumes where a previous run stopped."""
