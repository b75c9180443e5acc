"""The gRPC adapters of the model: servicers, conversions, the errno -> status table and
the server (`app.start_server`)."""
