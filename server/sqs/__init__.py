"""The Amazon SQS wire protocols: JSON 1.0 and the older query (form and XML) protocol."""
