"""The FID Inception-v3 built from torchvision's Inception3 blocks (torchvision >= 0.8),
with the TF-graph variants of pytorch-fid / StyleGAN: the average pools inside blocks A,
C and E_1 do not count padding, and the last block (E_2) pools with a max pool.
Shared by make_inception_ref.py and convert_inception.py. Written for this project from
the published description of the TF FID Inception graph; no code copied."""
import torch
import torch.nn.functional as F
import torchvision.models.inception as tvi


def _avg3(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(tvi.InceptionA):
    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class BlockC(tvi.InceptionC):
    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class BlockE(tvi.InceptionE):
    def __init__(self, in_channels, use_max_pool):
        super().__init__(in_channels)
        self.use_max_pool = use_max_pool

    def forward(self, x):
        b1 = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.use_max_pool else _avg3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


def fid_inception():
    net = tvi.Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False,
                         inception_blocks=[tvi.BasicConv2d, BlockA, tvi.InceptionB, BlockC, tvi.InceptionD,
                                           tvi.InceptionE, tvi.InceptionAux])
    net.Mixed_5b = BlockA(192, pool_features=32)
    net.Mixed_5c = BlockA(256, pool_features=64)
    net.Mixed_5d = BlockA(288, pool_features=64)
    net.Mixed_6b = BlockC(768, channels_7x7=128)
    net.Mixed_6c = BlockC(768, channels_7x7=160)
    net.Mixed_6d = BlockC(768, channels_7x7=160)
    net.Mixed_6e = BlockC(768, channels_7x7=192)
    net.Mixed_7b = BlockE(1280, use_max_pool=False)
    net.Mixed_7c = BlockE(2048, use_max_pool=True)
    return net.eval()


def tf1_resize(x, size=299):
    """TF1 resize_bilinear semantics as StyleGAN's TorchScript model does it: affine_grid
    with a translation, grid_sample bilinear with border padding (src = dst*in/out)."""
    n, _, h, w = x.shape
    theta = torch.tensor([[1.0, 0.0, 1.0 / w - 1.0 / size], [0.0, 1.0, 1.0 / h - 1.0 / size]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(n, 2, 3), (n, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pool3_features(net, x_u8):
    """uint8 (N,3,H,W) -> (N,2048), TF1 resize and (x-128)/128, in the net's dtype."""
    dt = next(net.parameters()).dtype
    x = tf1_resize(x_u8.to(dt))
    x = (x - 128) / 128
    for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                 "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]:
        x = getattr(net, name)(x)
    return x.flatten(1)
