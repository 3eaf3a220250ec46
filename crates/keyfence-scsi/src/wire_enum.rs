//! [`wire_enum!`](crate::wire_enum): an enum of one-byte wire codes
//! declared from a single table.

/// Declares an enum of one-byte wire codes from one table, in the style of
/// rustls' `enum_builder!`.
///
/// Each variant is written once, with its wire value and the short
/// description the standard gives it; decoding, encoding, the description
/// and the list of defined values are generated from that one table, so
/// there is no second hand-kept `match` that can drift from the first.
/// The caller writes the derives it wants (they are passed through, as are
/// doc comments and attributes such as `#[default]` on variants).
///
/// Two shapes:
///
/// * **Closed**: only the listed values exist. The enum is fieldless and
///   `#[repr(u8)]` (so `x as u8` works). `from_u8` returns `Option<Self>`,
///   or, when the header ends in `else Error::Variant`, `Result<Self,
///   Error>` with `Error::Variant(value)` for an undefined value.
///
///   ```
///   keyfence_scsi::wire_enum! {
///       #[derive(Debug, Clone, Copy, PartialEq, Eq)]
///       pub enum Colour: u8 {
///           Red = 1 => "red",
///           Blue = 4 => "blue",
///       }
///   }
///   assert_eq!(Colour::from_u8(4), Some(Colour::Blue));
///   assert_eq!(Colour::from_u8(2), None);
///   assert_eq!(Colour::Red.to_u8(), 1);
///   assert_eq!(Colour::Blue.description(), "blue");
///   assert_eq!(Colour::ALL, [Colour::Red, Colour::Blue]);
///   ```
///
/// * **Open**: every byte decodes. A trailing `other Variant => "text";`
///   adds `Variant(u8)` for the values not listed; `from_u8` is total and
///   `From<u8>` is implemented.
///
///   ```
///   keyfence_scsi::wire_enum! {
///       #[derive(Debug, Clone, Copy, PartialEq, Eq)]
///       pub enum Answer: u8 {
///           Yes = 0 => "yes",
///           No = 255 => "no",
///       }
///       /// Any other value.
///       other Unknown => "reserved";
///   }
///   assert_eq!(Answer::from_u8(7), Answer::Unknown(7));
///   assert_eq!(Answer::Unknown(7).to_u8(), 7);
///   assert_eq!(Answer::from(255), Answer::No);
///   assert_eq!(Answer::Unknown(7).description(), "reserved");
///   ```
///
/// Both shapes generate `to_u8`, `description`, `ALL` (the listed variants
/// in declaration order) and `From<Enum> for u8`.
#[macro_export]
macro_rules! wire_enum {
    // Open: the listed values plus a catch-all variant.
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: u8 {
            $( $(#[$vmeta:meta])* $var:ident = $val:literal => $desc:literal ),+ $(,)?
        }
        $(#[$ometa:meta])*
        other $other:ident => $odesc:literal;
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $var, )+
            $(#[$ometa])*
            $other(u8),
        }

        impl $name {
            /// Every listed value, in declaration order.
            pub const ALL: [Self; [$(stringify!($var)),+].len()] = [$(Self::$var),+];

            /// Decodes a wire value; values not listed become
            #[doc = concat!("`", stringify!($other), "(v)`.")]
            pub const fn from_u8(v: u8) -> Self {
                match v {
                    $( $val => Self::$var, )+
                    v => Self::$other(v),
                }
            }

            /// The wire value.
            pub const fn to_u8(self) -> u8 {
                match self {
                    $( Self::$var => $val, )+
                    Self::$other(v) => v,
                }
            }

            /// A short description, as the standard names the value.
            pub const fn description(self) -> &'static str {
                match self {
                    $( Self::$var => $desc, )+
                    Self::$other(_) => $odesc,
                }
            }
        }

        impl ::core::convert::From<u8> for $name {
            fn from(v: u8) -> Self {
                Self::from_u8(v)
            }
        }

        impl ::core::convert::From<$name> for u8 {
            fn from(v: $name) -> u8 {
                v.to_u8()
            }
        }
    };

    // Closed: only the listed values.
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: u8 $(else $err:ident :: $errvar:ident)? {
            $( $(#[$vmeta:meta])* $var:ident = $val:literal => $desc:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(u8)]
        $vis enum $name {
            $( $(#[$vmeta])* $var = $val, )+
        }

        impl $name {
            /// Every defined value, in declaration order.
            pub const ALL: [Self; [$(stringify!($var)),+].len()] = [$(Self::$var),+];

            /// The wire value.
            pub const fn to_u8(self) -> u8 {
                self as u8
            }

            /// A short description, as the standard names the value.
            pub const fn description(self) -> &'static str {
                match self {
                    $( Self::$var => $desc, )+
                }
            }
        }

        $crate::wire_enum!(@from_u8 $name $(else $err::$errvar)? { $($var = $val),+ });

        impl ::core::convert::From<$name> for u8 {
            fn from(v: $name) -> u8 {
                v as u8
            }
        }
    };

    (@from_u8 $name:ident { $($var:ident = $val:literal),+ }) => {
        impl $name {
            /// Decodes a wire value; `None` when it is not defined.
            pub const fn from_u8(v: u8) -> Option<Self> {
                match v {
                    $( $val => Some(Self::$var), )+
                    _ => None,
                }
            }
        }
    };

    (@from_u8 $name:ident else $err:ident :: $errvar:ident { $($var:ident = $val:literal),+ }) => {
        impl $name {
            /// Decodes a wire value; one that is not defined is
            #[doc = concat!("`", stringify!($err), "::", stringify!($errvar), "(v)`.")]
            pub fn from_u8(v: u8) -> Result<Self, $err> {
                match v {
                    $( $val => Ok(Self::$var), )+
                    v => Err($err::$errvar(v)),
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::wire_enum! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Closed: u8 {
            A = 0 => "a",
            B = 0x7f => "b",
            C = 0xff => "c",
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Error {
        Undefined(u8),
    }

    crate::wire_enum! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Fallible: u8 else Error::Undefined {
            X = 3 => "x",
        }
    }

    crate::wire_enum! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Open: u8 {
            P = 1 => "p",
            Q = 2 => "q",
        }
        other Rest => "rest";
    }

    #[test]
    fn closed_decodes_exactly_the_listed_values() {
        for v in 0..=u8::MAX {
            let want = Closed::ALL.iter().copied().find(|c| *c as u8 == v);
            assert_eq!(Closed::from_u8(v), want, "value {v:#x}");
        }
        assert_eq!(Closed::ALL.len(), 3);
        assert_eq!(u8::from(Closed::B), 0x7f);
        assert_eq!(Closed::C.to_u8(), 0xff);
        assert_eq!(Closed::A.description(), "a");
    }

    #[test]
    fn fallible_reports_the_undefined_value() {
        assert_eq!(Fallible::from_u8(3), Ok(Fallible::X));
        assert_eq!(Fallible::from_u8(4), Err(Error::Undefined(4)));
        assert_eq!(Fallible::ALL, [Fallible::X]);
        assert_eq!((Fallible::X.to_u8(), Fallible::X.description()), (3, "x"));
    }

    #[test]
    fn open_round_trips_every_byte() {
        for v in 0..=u8::MAX {
            let o = Open::from_u8(v);
            assert_eq!(o.to_u8(), v);
            assert_eq!(u8::from(o), v);
            match v {
                1 => assert_eq!(o, Open::P),
                2 => assert_eq!(o, Open::Q),
                _ => {
                    assert_eq!(o, Open::Rest(v));
                    assert_eq!(o.description(), "rest");
                }
            }
        }
        assert_eq!(Open::ALL, [Open::P, Open::Q]);
    }
}
