from mnist_lightning.sweep.study import main

main()
