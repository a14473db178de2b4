"""One module per objective: input checks, ops, autograd and the public function."""
