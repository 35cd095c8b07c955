"""GeneratorService tests: providers, storage and the gRPC server against local fake HTTP services."""
