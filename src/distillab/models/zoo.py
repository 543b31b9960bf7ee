"""Imports every model family so that their `@register` calls run (loaded lazily by the registry)."""

from distillab.models import mobilenetv2, resnet, resnet_cifar, shufflenet, vgg, vit, wrn  # noqa: F401
