"""Graph passes: capture (torch.export), group analysis, importance, selection and the shrinking rewrite."""
