"""Below everything: errors, and (as it grows) the typed run spec and the batch schema."""
