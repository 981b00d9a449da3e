"""peft tuners for the tensor-train methods (config / layer / model per method)."""
