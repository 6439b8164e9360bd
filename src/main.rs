fn main() {
    for crd in herald::crds::all() {
        println!("---\n{}", herald::crds::to_yaml(&crd));
    }
}
