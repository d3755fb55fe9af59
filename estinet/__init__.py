"""estinet: a reproduction of Estimate-and-Replace (Jacovi et al., ICLR 2019) on MNIST image addition."""
