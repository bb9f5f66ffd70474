"""Data: files -> Conversation -> (input_ids, labels); templates, packing, collators, doctor."""
